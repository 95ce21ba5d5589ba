# Finds the onnxruntime C API header the op library compiles against; it is never committed.
#   1. -DSLIM_ONNX_ORT_INCLUDE_DIR=... or the environment variable of the same name: a folder with
#      onnxruntime_c_api.h.
#   2. The cache, $SLIM_ONNX_CACHE_DIR or ~/.cache/slim-onnx, from an earlier build.
#   3. Download: the MIT-licensed npm package below ships the public headers of onnxruntime 1.29.0.
#      The library stamps its op with C API version 20 and uses nothing newer, so it loads in
#      onnxruntime 1.20 and later (op_common.h).
set(SLIM_ONNX_ORT_NPM_PACKAGE "com.github.asus4.onnxruntime@0.4.9")
set(SLIM_ONNX_ORT_HEADERS_IN_PACKAGE
    "package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64/onnxruntime.framework/Headers")

if(NOT SLIM_ONNX_ORT_INCLUDE_DIR AND DEFINED ENV{SLIM_ONNX_ORT_INCLUDE_DIR})
  set(SLIM_ONNX_ORT_INCLUDE_DIR "$ENV{SLIM_ONNX_ORT_INCLUDE_DIR}")
endif()

if(SLIM_ONNX_ORT_INCLUDE_DIR)
  if(NOT EXISTS "${SLIM_ONNX_ORT_INCLUDE_DIR}/onnxruntime_c_api.h")
    message(FATAL_ERROR "SLIM_ONNX_ORT_INCLUDE_DIR=${SLIM_ONNX_ORT_INCLUDE_DIR} has no onnxruntime_c_api.h")
  endif()
else()
  if(DEFINED ENV{SLIM_ONNX_CACHE_DIR})
    set(_cache "$ENV{SLIM_ONNX_CACHE_DIR}")
  elseif(DEFINED ENV{XDG_CACHE_HOME})
    set(_cache "$ENV{XDG_CACHE_HOME}/slim-onnx")
  else()
    set(_cache "$ENV{HOME}/.cache/slim-onnx")
  endif()
  set(SLIM_ONNX_ORT_INCLUDE_DIR "${_cache}/ort-headers-1.29.0")
  if(NOT EXISTS "${SLIM_ONNX_ORT_INCLUDE_DIR}/onnxruntime_c_api.h")
    find_program(_npm npm)
    if(NOT _npm)
      message(FATAL_ERROR
        "slim-onnx needs the onnxruntime C API headers to build. Install npm (it fetches "
        "${SLIM_ONNX_ORT_NPM_PACKAGE}), or point SLIM_ONNX_ORT_INCLUDE_DIR at a folder holding "
        "onnxruntime_c_api.h (onnxruntime >= 1.20).")
    endif()
    set(_dl "${CMAKE_BINARY_DIR}/ort-headers-download")
    file(REMOVE_RECURSE "${_dl}")
    file(MAKE_DIRECTORY "${_dl}")
    message(STATUS "slim-onnx: fetching onnxruntime headers (npm pack ${SLIM_ONNX_ORT_NPM_PACKAGE}, ~150 MB)")
    execute_process(COMMAND "${_npm}" pack "${SLIM_ONNX_ORT_NPM_PACKAGE}" --silent
                    WORKING_DIRECTORY "${_dl}" RESULT_VARIABLE _rc OUTPUT_VARIABLE _tgz ERROR_VARIABLE _err
                    OUTPUT_STRIP_TRAILING_WHITESPACE)
    if(NOT _rc EQUAL 0)
      message(FATAL_ERROR "npm pack ${SLIM_ONNX_ORT_NPM_PACKAGE} failed (${_rc}): ${_err}\n"
                          "Set SLIM_ONNX_ORT_INCLUDE_DIR to a folder with onnxruntime_c_api.h instead.")
    endif()
    execute_process(COMMAND tar xzf "${_tgz}" --wildcards "${SLIM_ONNX_ORT_HEADERS_IN_PACKAGE}/*.h"
                    WORKING_DIRECTORY "${_dl}" RESULT_VARIABLE _rc ERROR_VARIABLE _err)
    if(NOT _rc EQUAL 0)
      message(FATAL_ERROR "extracting the onnxruntime headers from ${_dl}/${_tgz} failed: ${_err}")
    endif()
    # Write to a temporary name, then rename, so an interrupted build never leaves a half cache.
    file(MAKE_DIRECTORY "${_cache}")
    string(MD5 _suffix "${CMAKE_BINARY_DIR}")
    set(_tmp "${SLIM_ONNX_ORT_INCLUDE_DIR}.tmp-${_suffix}")
    file(REMOVE_RECURSE "${_tmp}")
    file(MAKE_DIRECTORY "${_tmp}")
    file(GLOB _headers "${_dl}/${SLIM_ONNX_ORT_HEADERS_IN_PACKAGE}/*.h")
    file(COPY ${_headers} DESTINATION "${_tmp}")
    file(WRITE "${_tmp}/SOURCE.txt" "onnxruntime 1.29.0 public headers (MIT) from npm ${SLIM_ONNX_ORT_NPM_PACKAGE}\n")
    file(REMOVE_RECURSE "${SLIM_ONNX_ORT_INCLUDE_DIR}")
    file(RENAME "${_tmp}" "${SLIM_ONNX_ORT_INCLUDE_DIR}")
    file(REMOVE_RECURSE "${_dl}")
  endif()
endif()
message(STATUS "slim-onnx: onnxruntime headers from ${SLIM_ONNX_ORT_INCLUDE_DIR}")
