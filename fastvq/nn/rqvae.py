"""PLACEHOLDER: being written; replaced before commit."""
def RQVAE(*args, **kwargs):
    raise NotImplementedError('RQVAE')
