//! gzip and tar unboxing of a downloaded module (Istio unboxIfPossible).
