"""Low-resolution tissue detection and per-cell tissue fractions."""

from cytosyn.tissue.mask import cell_tissue_fractions, pen_mark_mask, tissue_mask

__all__ = ["cell_tissue_fractions", "pen_mark_mask", "tissue_mask"]
