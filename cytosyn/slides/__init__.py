"""Whole-slide images: one reader over OpenSlide and tiffslide, MPP resolution, reads at an exact MPP."""

from cytosyn.slides.reader import Slide, SlideError, open_slide

__all__ = ["Slide", "SlideError", "open_slide"]
