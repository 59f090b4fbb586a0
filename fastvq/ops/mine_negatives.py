"""PLACEHOLDER: being written; replaced before commit."""
def mine_negatives(*args, **kwargs):
    raise NotImplementedError('mine_negatives')
