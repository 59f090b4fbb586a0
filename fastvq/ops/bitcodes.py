"""PLACEHOLDER: being written; replaced before commit."""
def to_bits(*args, **kwargs):
    raise NotImplementedError('to_bits')
def to_decimal(*args, **kwargs):
    raise NotImplementedError('to_decimal')
