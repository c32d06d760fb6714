"""LesionNet web app: a FastAPI server that classifies one uploaded lesion photo and explains the answer.

Run with ``python -m lesionnet.app ckpt=... [scores=.../scores.json]``; see ``lesionnet/conf/serve.yaml``.
"""
