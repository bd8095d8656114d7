{
  "targets": [
    {
      "target_name": "vhostd_native",
      "sources": [
        "src/addon.cc",
        "src/errno.cc",
        "src/socket.cc",
        "src/mmap.cc",
        "src/eventfd.cc",
        "src/poll.cc",
        "src/sd-notify.cc",
        "src/io-uring.cc",
        "src/io-batch.cc",
        "src/file.cc",
        "src/tap.cc",
        "src/reclaim.cc",
        "src/random.cc"
      ],
      "include_dirs": ["<!@(node -p \"require('node-addon-api').include\")"],
      "defines": ["NAPI_VERSION=9", "NAPI_DISABLE_CPP_EXCEPTIONS", "_GNU_SOURCE"],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions"],
      "cflags_cc": ["-std=c++20", "-Wall", "-Wextra", "-Werror", "-fstack-protector-strong", "-fvisibility=hidden"],
      "libraries": ["-luring"]
    }
  ]
}
