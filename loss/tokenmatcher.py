"""TokenMatcher training losses for unsupervised visible-infrared ReID, per stage.

Inputs of every stage: the BN features of a batch, IR ``f_ir`` [B_ir, D] and RGB ``f_rgb``
[B_rgb, D] (the RGB rows hold both augmented views, with their labels and indexes
duplicated), their pseudo labels, and the raw class tokens ``tokens_*`` ([B, K, C] or K
tensors [B, C]) for the diversity loss ``div`` (:mod:`loss.token_diversity`). Each
function returns ``(total, terms, info)``: ``terms`` the unweighted terms and ``total`` as
floats, ``info`` the weights in force.

**Stage 1** (:func:`stage1_loss`), per-modality memories::

    total = M_ir(f_ir, y_ir) + M_rgb(f_rgb, y_rgb) + (div(tokens_ir) + div(tokens_rgb))

**Camera-local runs** (:func:`camera_local_loss`): ``M(f, y) + div(tokens)``.

**Stage 2** (:class:`Stage2Loss`), with the memories of :class:`Stage2Memories` and a cluster
match (:class:`cluster.matching.ClusterMatch`; r2i maps RGB labels to IR labels, i2r back)::

    cls   = mixed_ir(f_ir, y_ir) + mixed_rgb(f_rgb, y_rgb)
    nb    = instance_ir(f_ir, N_ir[i_ir]) + instance_rgb(f_rgb, N_rgb[i_rgb])
            + instance_ir(f_rgb, N_r2i[i_rgb])       (even epochs)
            | instance_rgb(f_ir, N_i2r[i_ir])        (odd epochs, added second)
    cross = mixed_rgb(f_ir, ir_to_rgb(y_ir)) + mixed_ir(f_rgb, rgb_to_ir(y_rgb))
    mate  = modality_rgb(f_rgb[kept], mate targets)  (mirror branch: modality_ir over IR rows)
    total = cls_ir + cls_rgb + div + lambda_nb * nb + lambda_cross * cross + lambda_mate * mate

The memory calls are made in exactly this order, since a memory called twice updates its
bank in the later call's backward first (:mod:`loss.cluster_memory`); the cross calls pull
the mixed memories towards the *other* modality. N_* are the DTNL neighbour lists
(:mod:`cluster.dtnl`) looked up by each row's image index i (``lookup_by_camera`` looks
them up by the row's camera id instead: the released RegDB stage 2 stores the camera id
where the index belongs, so every row uses image 0's lists there).

Mate rows: for a row labelled y whose partner p has exactly two clusters [a, b] (a first),
even epochs keep the rows with y = a and give them target b, odd epochs the rows with y = b
with target a; all other rows are dropped, and without kept rows the term is 0. The
released code orders the kept features as ``list(set(range(n)) - set(dropped))`` while the
targets stay in row order; CPython's set order is ascending for most batches but not all, in
which case features and targets are misaligned. That order is kept by default;
``fix_mate_row_order=True`` keeps the rows in ascending order.

Weights: ``lambda_mate`` for epochs <= ``mate_switch_epoch``, ``lambda_mate_late`` after
(the released SYSU recipe: 0.03, then 0.12 from epoch 36). A zero weight skips its memory
calls (the released code makes them but never back-propagates them, so no bank moves), and
its term is then absent from ``terms``, as are cross and mate when there is no cluster.
"""
import torch
import torch.nn as nn

from loss.cluster_memory import ClusterMemory
from loss.token_diversity import token_diversity_loss

_STAGE2_MEMORIES = ("mixed_ir", "mixed_rgb", "modality_ir", "modality_rgb", "instance_ir", "instance_rgb")


def _floats(terms):
    return {name: float(value.detach()) if torch.is_tensor(value) else float(value) for name, value in terms.items()}


def stage1_loss(memory_ir, memory_rgb, f_ir, f_rgb, labels_ir, labels_rgb, tokens_ir, tokens_rgb,
                diversity_balancer=True):
    """Stage-1 total, terms and info (module docstring)."""
    cluster_ir = memory_ir(f_ir, labels_ir)
    cluster_rgb = memory_rgb(f_rgb, labels_rgb)
    diversity = (token_diversity_loss(tokens_ir, diversity_balancer)
                 + token_diversity_loss(tokens_rgb, diversity_balancer))
    total = cluster_ir + cluster_rgb + diversity
    return total, _floats({"cluster_ir": cluster_ir, "cluster_rgb": cluster_rgb, "diversity": diversity,
                           "total": total}), {}


def camera_local_loss(memory, features, labels, tokens, diversity_balancer=True):
    """Camera-local run total, terms and info (module docstring)."""
    cluster = memory(features, labels)
    diversity = token_diversity_loss(tokens, diversity_balancer)
    total = cluster + diversity
    return total, _floats({"cluster": cluster, "diversity": diversity, "total": total}), {}


class Stage2Memories(nn.Module):
    """The six stage-2 memories as :class:`ClusterMemory` children:

    * ``mixed_ir`` [C_ir, D] / ``mixed_rgb`` [C_rgb, D]: cross-modal centroids in the IR / RGB
      label space (momentum 0.8 as released);
    * ``modality_ir`` / ``modality_rgb``: per-modality centroids, used only by the mate loss
      (momentum 0.2);
    * ``instance_ir`` [N_ir, D] / ``instance_rgb`` [N_rgb, D]: normalised features of every
      image, for the neighbour loss (never updated; None when that loss is off).

    ``state_dict()`` holds every bank; :meth:`from_banks` rebuilds the memories from
    :meth:`banks` of a checkpoint.
    """

    def __init__(self, mixed_ir, mixed_rgb, modality_ir, modality_rgb, instance_ir=None, instance_rgb=None):
        super().__init__()
        self.mixed_ir, self.mixed_rgb = mixed_ir, mixed_rgb
        self.modality_ir, self.modality_rgb = modality_ir, modality_rgb
        self.instance_ir, self.instance_rgb = instance_ir, instance_rgb

    @classmethod
    def from_banks(cls, banks, temp=0.05, mixed_momentum=0.8, modality_momentum=0.2, use_hard=False):
        """Memories holding copies of ``banks`` (name -> [rows, D]; the instance banks optional)."""
        momenta = {"mixed_ir": mixed_momentum, "mixed_rgb": mixed_momentum}
        memories = {name: ClusterMemory.from_bank(banks[name], temp=temp, use_hard=use_hard,
                                                  momentum=momenta.get(name, modality_momentum))
                    for name in _STAGE2_MEMORIES if banks.get(name) is not None}
        return cls(**memories)

    def banks(self):
        """name -> bank (the live buffers) of every memory present."""
        return {name: getattr(self, name).features for name in _STAGE2_MEMORIES if getattr(self, name) is not None}


def _lookup(lists, rows):
    return [lists[r] for r in rows]


class Stage2Loss:
    """The stage-2 total (module docstring). Weights ``lambda_neighbour``, ``lambda_cross``,
    ``lambda_mate`` (``lambda_mate_late`` after ``mate_switch_epoch``); ``lookup_by_camera``
    reproduces the released RegDB neighbour lookup; ``fix_mate_row_order`` aligns the mate
    rows with their targets."""

    def __init__(self, lambda_neighbour=0.5, lambda_cross=0.4, lambda_mate=0.03, lambda_mate_late=0.12,
                 mate_switch_epoch=35, diversity_balancer=True, lookup_by_camera=False, fix_mate_row_order=False):
        self.lambda_neighbour = float(lambda_neighbour)
        self.lambda_cross = float(lambda_cross)
        self.lambda_mate = float(lambda_mate)
        self.lambda_mate_late = float(lambda_mate_late)
        self.mate_switch_epoch = int(mate_switch_epoch)
        self.diversity_balancer = bool(diversity_balancer)
        self.lookup_by_camera = bool(lookup_by_camera)
        self.fix_mate_row_order = bool(fix_mate_row_order)

    @classmethod
    def from_config(cls, cfg):
        """From ``USL.*`` (see the keys read here) and ``DATASET.NAME`` (RegDB: camera lookup
        unless ``USL.FIX_REGDB_NEIGHBOUR_INDEX``)."""
        usl = cfg.USL
        regdb = cfg.DATASET.NAME == "regdb"
        return cls(lambda_neighbour=usl.LAMBDA_NEIGHBOUR, lambda_cross=usl.LAMBDA_CROSS, lambda_mate=usl.LAMBDA_MATE,
                   lambda_mate_late=usl.LAMBDA_MATE_LATE, mate_switch_epoch=usl.MATE_SWITCH_EPOCH,
                   diversity_balancer=usl.DIVERSITY_BALANCER,
                   lookup_by_camera=regdb and not usl.FIX_REGDB_NEIGHBOUR_INDEX,
                   fix_mate_row_order=usl.FIX_MATE_ROW_ORDER)

    def weights(self, epoch):
        """{"lambda_neighbour", "lambda_cross", "lambda_mate"} of the 0-based `epoch`."""
        mate = self.lambda_mate if epoch <= self.mate_switch_epoch else self.lambda_mate_late
        return {"lambda_neighbour": self.lambda_neighbour, "lambda_cross": self.lambda_cross, "lambda_mate": mate}

    def __call__(self, epoch, memories, match, f_ir, f_rgb, labels_ir, labels_rgb, tokens_ir, tokens_rgb,
                 neighbours=None, index_ir=None, index_rgb=None, camid_ir=None, camid_rgb=None):
        """Total, terms and info of one stage-2 batch; `neighbours` (a
        :class:`cluster.dtnl.NeighbourSets`) and the rows' image indexes (or camera ids with
        ``lookup_by_camera``) are needed when the neighbour weight is not 0."""
        weights = self.weights(epoch)
        labels_ir = torch.as_tensor(labels_ir, dtype=torch.int64, device=f_ir.device)
        labels_rgb = torch.as_tensor(labels_rgb, dtype=torch.int64, device=f_rgb.device)
        cluster_ir = memories.mixed_ir(f_ir, labels_ir)
        cluster_rgb = memories.mixed_rgb(f_rgb, labels_rgb)
        diversity = (token_diversity_loss(tokens_ir, self.diversity_balancer)
                     + token_diversity_loss(tokens_rgb, self.diversity_balancer))
        total = cluster_ir + cluster_rgb + diversity
        terms = {"cluster_ir": cluster_ir, "cluster_rgb": cluster_rgb, "diversity": diversity}
        if weights["lambda_neighbour"] != 0:
            terms["neighbour"] = self._neighbour(epoch, memories, neighbours, f_ir, f_rgb, index_ir, index_rgb,
                                                 camid_ir, camid_rgb)
            total = total + terms["neighbour"] * weights["lambda_neighbour"]
        mate_rows = 0
        if match.r2i:
            if weights["lambda_cross"] != 0:
                terms["cross"] = self._cross(memories, match, f_ir, f_rgb, labels_ir, labels_rgb)
                total = total + weights["lambda_cross"] * terms["cross"]
            if weights["lambda_mate"] != 0:
                terms["mate"], mate_rows = self._mate(epoch, memories, match, f_ir, f_rgb, labels_ir, labels_rgb)
                total = total + weights["lambda_mate"] * terms["mate"]
        terms["total"] = total
        return total, _floats(terms), dict(weights, mate_rows=float(mate_rows))

    def _rows(self, index, camid, name):
        rows = camid if self.lookup_by_camera else index
        if rows is None:
            raise ValueError("stage-2 neighbour loss: the batch's %s are required"
                             % (("camera ids (%s)" if self.lookup_by_camera else "image indexes (%s)") % name))
        return torch.as_tensor(rows).tolist()

    def _neighbour(self, epoch, memories, neighbours, f_ir, f_rgb, index_ir, index_rgb, camid_ir, camid_rgb):
        if neighbours is None or memories.instance_ir is None or memories.instance_rgb is None:
            raise ValueError("stage-2 neighbour loss: neighbour lists and instance memories are required "
                             "when its weight is not 0")
        rows_ir = self._rows(index_ir, camid_ir, "IR rows")
        rows_rgb = self._rows(index_rgb, camid_rgb, "RGB rows")
        intra_ir = memories.instance_ir.neighbour_loss(f_ir, _lookup(neighbours.ir, rows_ir))
        intra_rgb = memories.instance_rgb.neighbour_loss(f_rgb, _lookup(neighbours.rgb, rows_rgb))
        if epoch % 2 == 0:
            return intra_ir + intra_rgb + memories.instance_ir.neighbour_loss(f_rgb, _lookup(neighbours.r2i, rows_rgb))
        return intra_ir + memories.instance_rgb.neighbour_loss(f_ir, _lookup(neighbours.i2r, rows_ir)) + intra_rgb

    @staticmethod
    def _cross(memories, match, f_ir, f_rgb, labels_ir, labels_rgb):
        ir_in_rgb = torch.tensor([match.ir_to_rgb(y) for y in labels_ir.tolist()], device=f_ir.device)
        rgb_in_ir = torch.tensor([match.rgb_to_ir(y) for y in labels_rgb.tolist()], device=f_rgb.device)
        return memories.mixed_rgb(f_ir, ir_in_rgb) + memories.mixed_ir(f_rgb, rgb_in_ir)

    def _mate(self, epoch, memories, match, f_ir, f_rgb, labels_ir, labels_rgb):
        if match.mirror:
            features, labels, memory = f_ir, labels_ir, memories.modality_ir
        else:
            features, labels, memory = f_rgb, labels_rgb, memories.modality_rgb
        targets, dropped = [], []
        for row, label in enumerate(labels.tolist()):
            pair = match.mates(label, ir_anchor=match.mirror)
            if pair is not None and label == pair[epoch % 2]:
                targets.append(pair[1 - epoch % 2])
            else:
                dropped.append(row)
        if self.fix_mate_row_order:
            dropped_rows = set(dropped)
            kept = [row for row in range(len(labels)) if row not in dropped_rows]
        else:
            # the released row order: CPython's iteration order of this set of ints
            kept = list(set(range(len(labels))) - set(dropped))
        if not kept:
            return features.new_zeros(()), 0
        rows = torch.tensor(kept, device=features.device)
        return memory(features[rows], torch.tensor(targets, device=features.device)), len(kept)
