"""Mask R-CNN on top of `detection`: mask head, mask targets, mask pasting and segm evaluation."""
