"""The machinery that writes a store: create (temporary folder + rename), the writer, the shard encoder, O_DIRECT, durability."""
