// A C++ program using libwasm_ecds as an installed library: it converts a small DiscoveryResponse (no Wasm
// filter, so it comes back byte for byte) and builds the NACK of it. tests/install/run.sh builds it with
// CMake against a temporary prefix and checks the line it prints.
//
//   app CACHE_DIR
#include <iostream>
#include <string>

#include "wasm_ecds.hpp"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: app CACHE_DIR\n";
    return 2;
  }
  // DiscoveryResponse { version_info: "v1" (1), type_url: ECDS (4), nonce: "n1" (5) }, encoded by hand.
  const std::string type_url = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
  const std::string response = std::string("\x0a\x02v1", 4) + '\x22' + static_cast<char>(type_url.size()) +
                               type_url + std::string("\x2a\x02n1", 4);

  auto cache = wasm_ecds::Cache::open(wasm_ecds::Options{}.cache_dir(argv[1]));
  if (!cache) {
    std::cerr << "open: " << cache.error().message << "\n";
    return 1;
  }
  auto out = cache->convert(response);
  if (!out) {
    std::cerr << "convert: " << out.error().message << "\n";
    return 1;
  }
  if (*out != response) {
    std::cerr << "convert changed a response without Wasm filters\n";
    return 1;
  }
  auto nack = wasm_ecds::nack(response, "v0", "install test");
  if (!nack) {
    std::cerr << "nack: " << nack.error().message << "\n";
    return 1;
  }
  std::cout << "wasm_ecds " << wasm_ecds::version() << ": converted " << out->size() << " bytes unchanged, NACK "
            << nack->size() << " bytes\n";
  return 0;
}
