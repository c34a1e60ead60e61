"""The ``pfe`` section: how ``facescale pfe`` (and a pipeline's PFE stage) trains the uncertainty head.

Defaults follow the authors' CASIA-WebFace config (seasonSH/Probabilistic-Face-Embeddings,
``config/sphere64_casia.py``): 3000 steps of SGD with momentum 0.9, lr 1e-3 divided by 10 after step 2000, weight
decay 5e-4 on the FC weights, batches of 64 identities x 4 images.

A ``facescale pfe`` config is a training config plus this section (:class:`PFERunConfig`): the same file gives the
data (``data.*``, the loader's micro-batch ``train.batch_size``, ``train.seed``), the device (``scaling.use_gpu``)
and MLflow (``tracking.*``); the sections that only training reads (``model``, ``classifier``, ...) are accepted and
ignored, so the config a model was trained with can be passed as it is.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from facescale.config import FaceScaleConfig


class PFEConfig(BaseModel):
    """Training of the PFE uncertainty head on a frozen backbone (Shi & Jain, ICCV 2019)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    steps: int = Field(3000, gt=0, description="optimizer steps of the head")
    lr: float = Field(1e-3, gt=0, description="SGD learning rate (authors: 1e-3)")
    lr_milestones: list[int] = Field(default_factory=lambda: [2000], description="steps after which the lr is "
                                     "multiplied by lr_gamma (authors: [2000])")
    lr_gamma: float = Field(0.1, gt=0, le=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0, description="L2 on the head's FC weights (not on BN, scale, shift)")
    ids_per_batch: int = Field(64, ge=1, description="identities per batch (K)")
    images_per_id: int = Field(4, ge=2, description="images of each identity per batch (n >= 2: genuine pairs)")
    buffer_samples: int = Field(4096, gt=0, description="samples the identity batcher holds while identities fill "
                                "(at least ids_per_batch x images_per_id)")
    hidden_size: int | None = Field(None, gt=0, description="width of the head's first FC; null: the embedding "
                                    "size (authors)")
    bn_momentum: float = Field(0.005, gt=0, le=1, description="running-statistics momentum of the head's BN "
                               "(authors: decay 0.995 = 0.005); raise it for runs of a few hundred steps")
    seed: int | None = Field(None, description="seed of the head's init and the batcher; null: train.seed")
    log_every: int = Field(10, gt=0, description="steps per logging window (MLflow metrics, progress line)")
    init_head: str | None = Field(None, description="a PFE model (URI or directory) whose head starts this one; it "
                                  "must fit the model's feature map and embedding size")
    model_name: str = Field("model", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                            description="name of the logged backbone + head (runs:/<run id>/<model_name>)")

    @model_validator(mode="after")
    def _batch_fits_buffer(self) -> PFEConfig:
        need = self.ids_per_batch * self.images_per_id
        if self.buffer_samples < need:
            raise ValueError(f"pfe.buffer_samples={self.buffer_samples} cannot hold one batch of ids_per_batch x "
                             f"images_per_id = {self.ids_per_batch} x {self.images_per_id} = {need} samples")
        if any(m <= 0 for m in self.lr_milestones) or self.lr_milestones != sorted(set(self.lr_milestones)):
            raise ValueError(f"pfe.lr_milestones must be increasing positive steps, got {self.lr_milestones}")
        return self


class PFERunConfig(FaceScaleConfig):
    """The config of ``facescale pfe``: a training config with a ``pfe`` section."""

    pfe: PFEConfig = PFEConfig()
