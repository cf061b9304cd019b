// Replays launch scripts through lr_host_launch: the entry point of the sanitizer builds
// (AddressSanitizer + UndefinedBehaviorSanitizer, ThreadSanitizer) of host_launchers.cpp,
// which cannot be loaded into an uninstrumented Python. Script (whitespace separated):
//   launch <name> <gx> <gy> <gz> <bx> <by> <bz> <shared_bytes> <nargs>
//   then one line per argument:  i64 <v> | i32 <v> | f32 <v> | ptr <nbytes> <in_file> <out_file>
// Each ptr buffer is read from in_file before the launch and written to out_file after it.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

extern "C" int lr_host_launch(const char* name, const unsigned* grid, const unsigned* block,
                              unsigned long long shared_bytes, void** args,
                              const unsigned long long* nbytes, int nargs);

int main(int argc, char** argv) {
    if (argc != 2) {
        std::cerr << "usage: " << argv[0] << " SCRIPT\n";
        return 2;
    }
    std::ifstream script(argv[1]);
    std::string word;
    int launches = 0;
    while (script >> word) {
        if (word != "launch") {
            std::cerr << "bad script word " << word << "\n";
            return 2;
        }
        std::string name;
        unsigned grid[3], block[3];
        unsigned long long shared;
        int nargs;
        script >> name >> grid[0] >> grid[1] >> grid[2] >> block[0] >> block[1] >> block[2] >>
            shared >> nargs;
        std::vector<long long> i64(nargs);
        std::vector<int> i32(nargs);
        std::vector<float> f32(nargs);
        std::vector<void*> ptrs(nargs, nullptr);
        std::vector<void*> args(nargs);
        std::vector<unsigned long long> nbytes(nargs, 0);
        std::vector<std::string> outs(nargs);
        for (int i = 0; i < nargs; ++i) {
            std::string kind;
            script >> kind;
            if (kind == "i64") {
                script >> i64[i];
                args[i] = &i64[i];
            } else if (kind == "i32") {
                script >> i32[i];
                args[i] = &i32[i];
            } else if (kind == "f32") {
                script >> f32[i];
                args[i] = &f32[i];
            } else if (kind == "ptr") {
                std::string in;
                script >> nbytes[i] >> in >> outs[i];
                ptrs[i] = std::malloc(nbytes[i] ? nbytes[i] : 1);
                std::ifstream f(in, std::ios::binary);
                f.read(static_cast<char*>(ptrs[i]), static_cast<std::streamsize>(nbytes[i]));
                args[i] = &ptrs[i];
            } else {
                std::cerr << "bad argument kind " << kind << "\n";
                return 2;
            }
        }
        const int rc = lr_host_launch(name.c_str(), grid, block, shared, args.data(),
                                      nbytes.data(), nargs);
        if (rc != 0) {
            std::cerr << "lr_host_launch(" << name << ") returned " << rc << "\n";
            return 3;
        }
        for (int i = 0; i < nargs; ++i) {
            if (!ptrs[i]) continue;
            std::ofstream f(outs[i], std::ios::binary);
            f.write(static_cast<const char*>(ptrs[i]), static_cast<std::streamsize>(nbytes[i]));
            std::free(ptrs[i]);
        }
        ++launches;
    }
    std::cout << "replayed " << launches << " launches\n";
    return 0;
}
