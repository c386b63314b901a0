//! HTTP/HTTPS fetch with retries, bounded by a deadline.
