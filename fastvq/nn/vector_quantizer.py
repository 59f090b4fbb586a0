"""PLACEHOLDER: being written; replaced before commit."""
def VectorQuantizer(*args, **kwargs):
    raise NotImplementedError('VectorQuantizer')
