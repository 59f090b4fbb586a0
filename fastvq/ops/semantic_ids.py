"""PLACEHOLDER: being written; replaced before commit."""
def semantic_ids(*args, **kwargs):
    raise NotImplementedError('semantic_ids')
def semantic_id_stats(*args, **kwargs):
    raise NotImplementedError('semantic_id_stats')
def SemanticIdStats(*args, **kwargs):
    raise NotImplementedError('SemanticIdStats')
