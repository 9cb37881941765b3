"""Flip-averaged features of all training images, for the per-epoch clustering.

``extract_train_features(model, dataset, modality, device, embedding)`` ->
``(features, normalised)``, two float32 CPU tensors [N, D] in dataset order:

* ``features[i] = (f(x_i) + f(flip(x_i))) / 2``, where f is the model's embedding set
  ``embedding`` in eval mode, ``model(images, modality)``, and flip mirrors the input tensor
  along its width;
* ``normalised = features / |features|`` per row, what the Jaccard distance, the instance
  memories and the test use (the cluster centroids are means of ``features``).

The dataset yields ``(image [3, H, W], index)`` items (``index`` = the item's position,
as data.TestImageDataset does). The model is switched to eval mode for the extraction and
its mode restored afterwards.

Under ``torch.distributed`` (a torchrun run) each of the W processes extracts the items
``rank, rank + W, ...`` and the shards are gathered, so every process returns the whole
[N, D] result; the gather runs on the device for nccl and on the CPU otherwise.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset


def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _embedding(out, name):
    if not isinstance(out, dict):
        raise TypeError("the model must return a dict of embedding sets in eval mode, got %s" % type(out).__name__)
    if name is None:
        if len(out) != 1:
            raise ValueError("the model returns the embedding sets %s: name the one to cluster" % ", ".join(out))
        return next(iter(out.values()))
    if name not in out:
        raise ValueError("the model returns no embedding set %r (it has %s)" % (name, ", ".join(out)))
    return out[name]


@torch.no_grad()
def _extract(model, dataset, modality, device, embedding, batch_size, num_workers):
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    indices, parts = [], []
    for images, index in loader:
        images = images.to(device, non_blocking=True)
        f = _embedding(model(images, modality), embedding).float()
        flipped = _embedding(model(torch.flip(images, dims=[3]), modality), embedding).float()
        parts.append((f + flipped) / 2)
        indices.append(torch.as_tensor(index, dtype=torch.int64))
    return torch.cat(indices), torch.cat(parts)


def _gather(local, rank, world, n, device):
    """[n, D]: rows rank::world of every process's `local` block, in item order."""
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    per_rank = -(-n // world)
    padded = torch.zeros(per_rank, local.shape[1], dtype=local.dtype, device=on)
    padded[:len(local)] = local.to(on)
    blocks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(blocks, padded)
    out = torch.empty(n, local.shape[1], dtype=local.dtype)
    for r, block in enumerate(blocks):
        count = len(range(r, n, world))
        out[r::world] = block[:count].cpu()
    return out


def extract_train_features(model, dataset, modality, device, embedding=None, batch_size=256, num_workers=0):
    """(features, normalised): float32 CPU [N, D] each (module docstring).

    modality: the modality name every image is run with ("visible" or "infrared");
    embedding: the name of the set to use (None: the model's only set).
    """
    device = torch.device(device)
    n = len(dataset)
    rank, world = _world()
    if n < world:
        raise ValueError("%d training images cannot be shared among %d processes" % (n, world))
    was_training = model.training
    model.eval()
    try:
        shard = dataset if world == 1 else Subset(dataset, range(rank, n, world))
        index, local = _extract(model, shard, modality, device, embedding, batch_size, num_workers)
    finally:
        model.train(was_training)
    expected = torch.arange(rank, n, world)
    if not torch.equal(index, expected):
        raise ValueError("the dataset items must carry their own position as index (item k -> (image, k))")
    features = local.cpu() if world == 1 else _gather(local, rank, world, n, device)
    return features, F.normalize(features, dim=1)
