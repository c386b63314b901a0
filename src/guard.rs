//! Which addresses a fetch may connect to (SSRF rules), checked on every resolved address.
