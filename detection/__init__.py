"""Faster R-CNN with FPN on the backbones package: model, data, evaluation."""
