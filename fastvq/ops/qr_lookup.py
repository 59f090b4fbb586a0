"""PLACEHOLDER: being written; replaced before commit."""
def qr_lookup(*args, **kwargs):
    raise NotImplementedError('qr_lookup')
