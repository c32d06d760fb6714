"""LesionNet web app: a FastAPI server that classifies one uploaded lesion photo and explains the answer.

Run with ``lesionnet serve ckpt=... [scores=.../scores.json]``; see ``lesionnet/conf/serve.yaml``. HTTP (``api``,
``server``, ``schemas``), the upload (``upload``), the page (``static/``, ``ondevice``) and its words (``content``);
``service`` assembles one answer and ``build`` wires config to app. What the model decides (gates, referral,
heatmaps) is ``lesionnet.inference``'s.
"""
