"""Sans-I/O protocol codecs: parse, serialize and validate wire formats; no sockets here."""
