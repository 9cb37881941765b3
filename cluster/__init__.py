"""Clustering steps of unsupervised training: flip-averaged feature extraction of the
training images (``features``), exact k-nearest neighbours (``knn``), the k-reciprocal
Jaccard distance (``jaccard``), DBSCAN on its sparse radius graph (``dbscan``), the
per-epoch pseudo-labelling that chains them (``pseudo_labels``), the silhouette selection of
the camera-local clusterings (``camera``), the DTNL neighbour sets (``dtnl``) and the greedy
cross-modal cluster matching (``matching``)."""
