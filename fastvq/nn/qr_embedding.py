"""PLACEHOLDER: being written; replaced before commit."""
def QREmbedding(*args, **kwargs):
    raise NotImplementedError('QREmbedding')
