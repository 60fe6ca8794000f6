"""From labelled recordings to shippable weights and their measured card.

``dataset`` (the layout a site produces), ``train`` (the paper's loss and loop, named presets),
``fitting`` (train, calibrate on held-out infants, describe the training domain), ``calibration``
(Platt, thresholds), ``evaluate`` (the paper's metrics, intervals, abstention), ``model_card`` and
``pipeline`` (what ``mam train`` and ``mam evaluate`` do, end to end). Needs the ``train`` extra
(torch, scikit-learn); screening needs none of it.
"""
