"""The executor's tasks: text generation, embeddings, speech recognition and the vision tasks,
from request inputs and parameters to outputs."""
