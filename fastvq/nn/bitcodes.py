"""PLACEHOLDER: being written; replaced before commit."""
def Bitcodes(*args, **kwargs):
    raise NotImplementedError('Bitcodes')
