"""The fitting worker: refits the recommender and the estimators whenever new trial results
land, and stores every fit with its status, reason, data watermark and provenance.

- :mod:`server.worker.scopes`: which trials a fit covers (scopes), when a fit is stale (data
  watermarks), and the trials and loss curves as the estimators' inputs;
- :mod:`server.worker.steps_to_target`: trials and curves grouped into steps to a target
  loss (the input of the ``cbs`` kind and of the recommender's CBS law);
- :mod:`server.worker.records`: what a fit stores, and its JSON;
- :mod:`server.worker.fits`: one fit of each kind as a storable record (the recommender and
  the estimators of ``fitting/``), and the registry of kinds;
- :mod:`server.worker.cbs_fit`: the ``cbs`` kind;
- :mod:`server.worker.loop`: refit passes, advisory locks, the long-running worker that
  LISTENs for new trials, and its thread inside ``hyperlaw serve``.

Nothing is imported here, so that reading scopes or fit records does not load the loop.
"""
