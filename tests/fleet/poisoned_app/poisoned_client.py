"""pock_tvm's ClientApp, except that a node started with ``poison=true`` answers with NaN tensors."""

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from pock_tvm.fleet import client_app
from pock_tvm.fleet.records import from_record, to_record

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = client_app.train(msg, context)
    if not context.node_config.get("poison"):
        return reply
    tensors = {k: np.full_like(v, np.nan) for k, v in from_record(reply.content["arrays"]).items()}
    return Message(content=RecordDict({"arrays": to_record(tensors), "metrics": reply.content["metrics"]}),
                   reply_to=msg)
