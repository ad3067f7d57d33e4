# The two commands: `make run` (the main job) and `make test` (everything CI checks).
BUILD      ?= build
ASAN_BUILD ?= build-asan
FUZZ_BUILD ?= build-fuzz
FUZZ_SECONDS ?= 60
TEST_FUZZ_SECONDS ?= 20
JOBS       ?= 2
GENERATOR  := $(shell command -v ninja >/dev/null 2>&1 && echo "-G Ninja")

.PHONY: all deps build run test test-release test-asan test-fuzz fuzz format clean

all: build

deps:
	@scripts/install_deps.sh

build: deps
	cmake -S . -B $(BUILD) $(GENERATOR) -DCMAKE_BUILD_TYPE=Release -DKVCACHE_WERROR=ON
	cmake --build $(BUILD) -j $(JOBS)

run: deps
	cmake -S . -B $(BUILD) $(GENERATOR) -DCMAKE_BUILD_TYPE=Release -DKVCACHE_WERROR=ON
	cmake --build $(BUILD) -j $(JOBS) --target kvcache_cli
	./$(BUILD)/tools/kvcache/kvcache demo

# Release build with every test, a short fuzz pass, then the CPU build again under ASan + UBSan.
test: test-release test-fuzz test-asan

test-release: build
	ctest --test-dir $(BUILD) --output-on-failure -j $(JOBS)

test-asan: deps
	cmake -S . -B $(ASAN_BUILD) $(GENERATOR) -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	  -DKVCACHE_SANITIZE=ON -DKVCACHE_CUDA=OFF -DKVCACHE_WERROR=ON
	cmake --build $(ASAN_BUILD) -j $(JOBS)
	ctest --test-dir $(ASAN_BUILD) --output-on-failure -j $(JOBS)

# The BlockManager fuzzer (libFuzzer: clang, ASan + UBSan) for FUZZ_SECONDS, growing a corpus in
# $(FUZZ_BUILD)/corpus; crashes are saved as $(FUZZ_BUILD)/crash-*. See tests/fuzz/README.md.
fuzz: deps
	CC=clang CXX=clang++ cmake -S . -B $(FUZZ_BUILD) $(GENERATOR) -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	  -DKVCACHE_FUZZ=ON -DKVCACHE_CUDA=OFF -DKVCACHE_BUILD_TESTS=OFF
	cmake --build $(FUZZ_BUILD) -j $(JOBS) --target block_manager_fuzz
	mkdir -p $(FUZZ_BUILD)/corpus/block_manager
	./$(FUZZ_BUILD)/tests/fuzz/block_manager_fuzz -max_total_time=$(FUZZ_SECONDS) \
	  -print_final_stats=1 -artifact_prefix=$(FUZZ_BUILD)/ \
	  $(FUZZ_BUILD)/corpus/block_manager $(wildcard tests/fuzz/regress)

# The fuzzer's progress lines go to a log; its final stats (or, on a failure, the log's end) print.
test-fuzz:
	@mkdir -p $(FUZZ_BUILD)
	@$(MAKE) --no-print-directory fuzz FUZZ_SECONDS=$(TEST_FUZZ_SECONDS) > $(FUZZ_BUILD)/test-fuzz.log 2>&1 \
	  || { tail -n 80 $(FUZZ_BUILD)/test-fuzz.log; exit 1; }
	@grep -E '^(Done|stat::)' $(FUZZ_BUILD)/test-fuzz.log

format:
	git ls-files '*.h' '*.cpp' '*.cu' '*.cuh' | xargs clang-format -i

clean:
	rm -rf $(BUILD) $(ASAN_BUILD) $(FUZZ_BUILD)
