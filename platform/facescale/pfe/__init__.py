"""Probabilistic Face Embeddings (Shi & Jain, ICCV 2019): an uncertainty head on a frozen backbone.

``model`` holds the head and :class:`~facescale.pfe.model.PFEModel` (backbone + head, logged as one model), ``loss``
the MLS loss, ``config`` the ``pfe`` section, ``train`` the loop and the ``facescale pfe`` job, ``cli`` its command.
The scores and template fusion that use the head's output are in :mod:`facescale.eval.pfe`.
"""
