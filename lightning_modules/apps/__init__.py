"""Applications built on the method packages: the demos (``demo.py`` registry, ``ecm_demo.py``; their claims contract
in ``claims.py``, shared stage helpers in ``stages.py``) and the data tools (``data.py``, ``tokenize.py``) behind
``ctrlgen data`` and ``ctrlgen demo``. Method packages and shared modules never import this package."""
