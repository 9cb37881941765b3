"""The unsupervised training engine behind train_usl.py (TokenMatcher's clustering loop).

A run is a plan of stages (:mod:`.stages`); every epoch of a stage re-labels the training
images by clustering (:mod:`.labelling`), trains a fixed number of iterations against the
cluster memories (:mod:`.epoch`), logs the pseudo-label quality for monitoring
(:mod:`.monitor`), evaluates on the test protocol and selects the stage's model
(:mod:`.evaluation`); :mod:`.state` turns all of it into a resumable checkpoint.
"""
