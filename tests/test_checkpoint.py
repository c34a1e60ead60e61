"""The training checkpoint restores backbone, classifier, optimizer, progress and RNG as one object; each rank reads
only its share of it (its own files, the replicated ones, and the class ranges it owns)."""

import datetime
import json
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from facescale import storage
from facescale.checkpoint.committed import IncompleteCheckpointError, local_copy, resolve_checkpoint, verify_checkpoint
from facescale.checkpoint.format import TrainCheckpoint, TrainProgress
from facescale.checkpoint.store import CheckpointStore
from facescale.heads import CombinedMarginLoss, NormalizedLinearClassifier
from facescale.models import build_backbone
from facescale.parallel import PartialFC, SparseRowSGD
from facescale.parallel.dist import class_range, free_loopback_port
from facescale.train.schedule import lr_at


def make_state(seed):
    torch.manual_seed(seed)
    backbone = build_backbone("iresnet_tiny", 16)
    head = NormalizedLinearClassifier(CombinedMarginLoss(16.0, 1.0, 0.0, 0.2), 16, 7)
    opt = torch.optim.SGD(list(backbone.parameters()) + list(head.parameters()), lr=0.1, momentum=0.9)
    return backbone, head, {"sgd": opt}


def one_step(backbone, head, opts, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(4, 3, 112, 112, generator=g), torch.randint(0, 7, (4,), generator=g)
    loss = head(backbone(x), y)
    opts["sgd"].zero_grad()
    loss.backward()
    opts["sgd"].step()
    return loss.item()


def test_round_trip_continues_identically(tmp_path):
    backbone, head, opts = make_state(0)
    one_step(backbone, head, opts, 1)
    progress = TrainProgress(step=1, epoch=0, step_in_epoch=1, world_size=2)
    TrainCheckpoint(backbone, head, opts, progress).save(tmp_path, rank=0)
    torch.manual_seed(1234)
    expected_rand = torch.rand(3)
    expected_loss = one_step(backbone, head, opts, 2)

    backbone2, head2, opts2 = make_state(99)  # different init: everything must come from the checkpoint
    restored = TrainCheckpoint(backbone2, head2, opts2, TrainProgress()).load(tmp_path, rank=0)
    assert (restored.step, restored.step_in_epoch, restored.world_size) == (1, 1, 2)
    torch.manual_seed(1234)
    assert torch.equal(torch.rand(3), expected_rand)
    assert one_step(backbone2, head2, opts2, 2) == pytest.approx(expected_loss, rel=1e-6)
    for a, b in zip(backbone.state_dict().values(), backbone2.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


def test_incomplete_checkpoint_refused(tmp_path):
    backbone, head, opts = make_state(0)
    with pytest.raises(FileNotFoundError, match="no progress.json"):
        TrainCheckpoint(backbone, head, opts, TrainProgress()).load(tmp_path, rank=0)
    TrainCheckpoint(backbone, head, opts, TrainProgress()).save(tmp_path, rank=0)
    meta = json.loads((tmp_path / "progress.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "progress.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version 99"):
        TrainCheckpoint(backbone, head, opts, TrainProgress()).load(tmp_path, rank=0)


def test_lr_schedule_warmup_then_poly():
    assert lr_at(0, 100, 0.1, warmup_steps=10) == pytest.approx(0.01)
    assert lr_at(9, 100, 0.1, warmup_steps=10) == pytest.approx(0.1)
    assert lr_at(10, 100, 0.1, warmup_steps=10) == pytest.approx(0.1)
    assert lr_at(55, 100, 0.1, warmup_steps=10, power=2.0) == pytest.approx(0.1 * 0.5 ** 2)
    assert lr_at(100, 100, 0.1, warmup_steps=10) == 0.0
    lrs = [lr_at(s, 100, 0.1, 10) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_a_missing_rank_file_is_an_error_naming_it(tmp_path):
    backbone, head, opts = make_state(0)
    saved = TrainProgress(step=3, world_size=2)
    TrainCheckpoint(backbone, head, opts, saved).save(tmp_path, rank=1)
    TrainCheckpoint(backbone, head, opts, saved).save(tmp_path, rank=0)
    (tmp_path / "rng_rank1.pt").unlink()
    backbone2, head2, opts2 = make_state(99)
    before = [p.detach().clone() for p in backbone2.parameters()]
    with pytest.raises(IncompleteCheckpointError, match=rf"checkpoint {tmp_path}: rng_rank1.pt is missing, but rank 1 "
                       "was one of the 2 ranks that saved it") as info:
        TrainCheckpoint(backbone2, head2, opts2, TrainProgress()).load(tmp_path, rank=1)
    assert info.value.file == "rng_rank1.pt" and info.value.checkpoint == str(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(before, backbone2.parameters())), "refused before restoring"
    # A rank beyond the saved world size (an elastic resume onto more ranks) keeps its fresh seed.
    torch.manual_seed(7)
    fresh = torch.get_rng_state()
    restored = TrainCheckpoint(backbone2, head2, opts2, TrainProgress()).load(tmp_path, rank=2)
    assert restored.step == 3 and restored.local_loader_position == {} and torch.equal(torch.get_rng_state(), fresh)


# --- per-rank resume I/O: each rank downloads only its share of an S3 checkpoint (real gloo ranks, real moto S3) ---

NUM_CLASSES, DIM = 11, 8
REPLICATED = {"model.pt", "optimizer.pt", "progress.json", "partial_fc.json"}


def _pfc_state(seed, world_size=None):
    """A Partial FC run: linear backbone, sharded centers with their SGD state after one step (seeded by ``seed``)."""
    torch.manual_seed(seed)
    backbone = torch.nn.Linear(4, DIM)
    pfc = PartialFC(CombinedMarginLoss(16.0, 1.0, 0.0, 0.2), DIM, NUM_CLASSES, seed=seed)
    opt = SparseRowSGD(pfc.parameters(), lr=0.1, momentum=0.9)
    pfc.attach_optimizer(opt)
    g = torch.Generator().manual_seed(seed)
    loss = pfc(torch.randn(4, DIM, generator=g), torch.randint(0, NUM_CLASSES, (4,), generator=g))
    loss.backward()
    opt.step()
    ckpt = TrainCheckpoint(backbone, pfc, {}, TrainProgress(step=1, world_size=pfc.world_size), arch={})
    return ckpt, pfc, opt


def _save_run(root, rank, world_size, barrier, out):
    """Saves a checkpoint to ``root``; writes this rank's centers + state to ``out`` for the reference."""
    ckpt, pfc, opt = _pfc_state(seed=1)
    uri = CheckpointStore(root, rank, world_size, barrier).save(1, lambda d: ckpt.save(d, rank))
    torch.save({"weight": pfc.weight.detach(), **opt.state[pfc.weight]}, os.path.join(out, f"saved_rank{rank}.pt"))
    return uri


def _resume_and_check(uri, rank, world_size, saved_world_size, out):
    """Resumes from ``uri`` with the rank's filter, counting what the storage layer downloads; checks the share."""
    ckpt, pfc, opt = _pfc_state(seed=2)  # other values: everything must come from the checkpoint
    got = []
    real_download = storage.download_file

    def counting_download(url, path):
        real_download(url, path)
        got.append((url.rsplit("/", 1)[1], os.path.getsize(path)))

    storage.download_file = counting_download
    try:
        with local_copy(uri, wanted=ckpt.files_for_rank(rank)) as directory:
            ckpt.load(directory, rank)
    finally:
        storage.download_file = real_download
    start, end = class_range(NUM_CLASSES, rank, world_size)
    saved_ranges = [class_range(NUM_CLASSES, r, saved_world_size) for r in range(saved_world_size)]
    want = REPLICATED | {f"partial_fc_classes_{s:010d}_{e:010d}.pt" for s, e in saved_ranges if s < end and start < e}
    want |= {f"rng_rank{rank}.pt"} if rank < saved_world_size else set()
    listed = verify_checkpoint(uri)["files"]
    assert sorted(name for name, _ in got) == sorted(want), (rank, world_size, got)
    downloaded = sum(size for _, size in got)
    assert downloaded == sum(listed[n] for n in want), (got, listed)
    if world_size > 1 and saved_world_size > 1:  # else one rank's share is the whole checkpoint
        assert downloaded < sum(listed.values()), (got, listed)
    saved = [torch.load(os.path.join(out, f"saved_rank{r}.pt")) for r in range(saved_world_size)]
    for key, value in opt.state[pfc.weight].items():
        if value.dim():
            assert torch.equal(value, torch.cat([s[key] for s in saved])[start:end]), key
    assert torch.equal(pfc.weight.detach(), torch.cat([s["weight"] for s in saved])[start:end])


def _two_rank_resume_worker(rank, world_size, port, save_root, resume_uri, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    if save_root:
        resume_uri = _save_run(save_root, rank, world_size, dist.barrier, out)
    saved_world_size = verify_checkpoint(resume_uri)["world_size"]
    _resume_and_check(resume_uri, rank, world_size, saved_world_size, out)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as tests/test_partial_fc.py: gloo threads once aborted during interpreter finalization


@pytest.mark.integration
def test_each_rank_downloads_only_its_share(tmp_path, bucket):
    two, one = f"s3://{bucket}/saved-on-2", f"s3://{bucket}/saved-on-1"
    # W=2 -> W=2 (save and resume in the same 2 processes)
    mp.spawn(_two_rank_resume_worker, args=(2, free_loopback_port(), two, None, str(tmp_path)), nprocs=2, join=True)
    uri = resolve_checkpoint(two)
    # W=2 -> W=1: this process, no process group
    _resume_and_check(uri, 0, 1, 2, str(tmp_path))
    # W=1 -> W=2: rank 1 did not exist at save time, so it has no rng file to download (and keeps its fresh seed)
    out_one = tmp_path / "one"
    out_one.mkdir()
    uri_one = _save_run(one, 0, 1, lambda: None, str(out_one))
    mp.spawn(_two_rank_resume_worker, args=(2, free_loopback_port(), None, uri_one, str(out_one)), nprocs=2,
             join=True)
