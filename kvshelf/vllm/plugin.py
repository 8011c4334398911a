"""vLLM general plugin: makes ``"kv_connector": "KVShelfConnector"`` work by name."""

CONNECTOR_NAME = "KVShelfConnector"


def register() -> None:
    """Called by vLLM in every process that loads general plugins."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(
            CONNECTOR_NAME, "kvshelf.vllm.connector", CONNECTOR_NAME
        )
