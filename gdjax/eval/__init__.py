"""Evaluation of the generator and of classifiers trained with replay.

`metrics` holds the pure numpy metrics (Fréchet and kernel distances, class-balance KLD and
ARD, accuracy, forgetting); `classifier` the SimpleCNN that labels samples and gives the
features of those distances; `hooks` the per-experience evaluation that the experience
loop calls. Submodules are imported on demand: `metrics` alone needs no JAX.
"""

# The evaluation classifiers by `eval.classifier` name (gdjax/eval/classifier.py builds them).
CLASSIFIERS = ("resnet18", "simple_cnn")
