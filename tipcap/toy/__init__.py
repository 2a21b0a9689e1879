"""The toy world of coloured shapes, a tiny CLIP trained on it, and scoring captions against its scenes.

Nothing is imported here: ``tipcap toyworld`` needs :mod:`tipcap.toy.world1` without the torch that
:mod:`tipcap.toy.clip` brings.
"""
