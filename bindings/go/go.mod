module github.com/wasm-ecds/wasm-ecds/bindings/go

go 1.19
