"""Smear analysis: a thin-smear field photograph in, red cells found and classified, parasitemia out.

- ``detect``: classical segmentation of the red cells (and what is not one).
- ``analysis``: crops for the model, counts, parasitemia with its Wilson interval.
- ``render``: the annotated field.
- ``annotations``: the IML annotation format and the evaluation against it (not served).
"""
