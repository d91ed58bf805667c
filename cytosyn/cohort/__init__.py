"""The cohort: TCGA barcodes and reference tables, slide inventories, TSS-stratified tile selection,
train / val_in / val_out / guidance splits, their leakage audit, and evaluation variants of tiles."""
