"""vLLM general plugin: makes ``"kv_connector": "KVShelfConnector"`` and
``"ec_connector": "KVShelfECConnector"`` work by name."""

CONNECTOR_NAME = "KVShelfConnector"
EC_CONNECTOR_NAME = "KVShelfECConnector"


def register() -> None:
    """Called by vLLM in every process that loads general plugins."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(
            CONNECTOR_NAME, "kvshelf.vllm.connector", CONNECTOR_NAME
        )
    try:
        from vllm.distributed.ec_transfer.ec_connector.factory import ECConnectorFactory
    except ImportError:  # a vLLM without encoder-cache connectors: the KV one still works
        return
    if EC_CONNECTOR_NAME not in ECConnectorFactory._registry:
        ECConnectorFactory.register_connector(
            EC_CONNECTOR_NAME, "kvshelf.vllm.ec_connector", EC_CONNECTOR_NAME
        )
