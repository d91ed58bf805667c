from cytosyn.cli.main import app

app(prog_name="cytosyn")
