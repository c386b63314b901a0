//! Wasm filter config carried as a `google.protobuf.Struct` inside a `udpa.type.v1.TypedStruct` or
//! `xds.type.v3.TypedStruct`.
