"""Framework adapters, installed as ``sparsecore.adapters``.

Each adapter imports its framework inside its own module, so importing
``sparsecore`` never imports PyTorch or Keras.
"""
