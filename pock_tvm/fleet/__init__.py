"""Federated sparse fine-tuning on Flower (``flwr``, its Deployment Engine).

Each node (a Flower SuperNode) trains a compiled pock_tvm step on its own data and sends back only
the tensors the scheme trains; its optimizer state stays on the node. The server (a Flower
ServerApp) averages those tensors, weighted by the nodes' sample counts (FedAvg), and rejects a
reply with non-finite or unexpected tensors, saying why.

- :mod:`.records`: trained tensors to and from Flower's ``ArrayRecord``.
- :mod:`.node`: what a node does with a round (train, evaluate) and the data file it reads;
  :mod:`.device`: the same with the C++ runner on the node's own bundle.
- :mod:`.strategy`: :class:`~.strategy.SparseFedAvg`, FedAvg that checks each reply.
- :mod:`.client_app` / :mod:`.server_app`: the Flower components (``flower_app/pyproject.toml``).
- :mod:`.federation`: starts a SuperLink and SuperNodes on this machine and runs the app on them.

Flower is an optional dependency (``pip install -e ".[fleet]"``); nothing here imports it at
package import.
"""
