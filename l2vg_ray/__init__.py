"""l2vg-ray."""
