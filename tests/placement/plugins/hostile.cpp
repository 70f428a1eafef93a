// A hostile C++ plugin for the sandbox tests: it reads files, dials out, leaks memory and looks at
// the processes around it, reporting what it managed (an error says what the system refused).
#include <edgecompute/plugin.hpp>

#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

namespace {

std::vector<void*> leaked;  // never freed: every call keeps what it took

const ec_algorithm_info algorithms[] = {
    {"read", "the number of bytes in the file params.path", 0.1, 0.0, 0},
    {"connect", "connect to 127.0.0.1:params.port over TCP; 1 when it connected", 0.1, 0.0, 0},
    {"leak", "allocate and touch params.mb megabytes, never freed; the megabytes held so far", 0.1, 0.0, 0},
    {"procs", "the pids in /proc and their names", 0.1, 0.0, 0},
};

const ec_plugin_info info = {EC_ABI_TARGET, "hostile", "1.0.0", 4, algorithms};

std::string failure(const std::string& what) { return what + ": " + std::strerror(errno); }

}  // namespace

extern "C" EC_EXPORT const ec_plugin_info* ec_info(void) { return &info; }

extern "C" EC_EXPORT int32_t ec_execute(const char* algorithm, const ec_buffer*, int32_t, const char* params_json,
                                        ec_result* result) {
    return ec::guard(result, [&] {
        ec::Params params(params_json);
        std::string name = algorithm;
        if (name == "read") {
            std::string path = params.string("path", "/etc/passwd");
            FILE* file = std::fopen(path.c_str(), "rb");
            if (!file) throw ec::Error(EC_INTERNAL_ERROR, failure("open " + path));
            int64_t total = 0;
            char chunk[4096];
            for (size_t n; (n = std::fread(chunk, 1, sizeof chunk, file)) > 0;) total += static_cast<int64_t>(n);
            std::fclose(file);
            *ec::output<int64_t>(result, "bytes", EC_INT64, {}) = total;
        } else if (name == "connect") {
            int fd = socket(AF_INET, SOCK_STREAM, 0);
            if (fd < 0) throw ec::Error(EC_INTERNAL_ERROR, failure("socket"));
            sockaddr_in address{};
            address.sin_family = AF_INET;
            address.sin_port = htons(static_cast<uint16_t>(params.integer("port", 80)));
            address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            int done = connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address);
            int error = errno;
            close(fd);
            errno = error;
            if (done != 0) throw ec::Error(EC_INTERNAL_ERROR, failure("connect"));
            *ec::output<int64_t>(result, "connected", EC_INT64, {}) = 1;
        } else if (name == "leak") {
            size_t bytes = static_cast<size_t>(params.integer("mb", 1024)) << 20;
            char* block = static_cast<char*>(std::malloc(bytes));
            if (!block) throw std::bad_alloc();
            for (size_t i = 0; i < bytes; i += 4096) block[i] = 1;  // touch every page: really use it
            leaked.push_back(block);
            *ec::output<int64_t>(result, "held_mb", EC_INT64, {}) =
                static_cast<int64_t>(leaked.size()) * params.integer("mb", 1024);
        } else if (name == "procs") {
            std::vector<int64_t> pids;
            std::string names;
            DIR* proc = opendir("/proc");
            if (!proc) throw ec::Error(EC_INTERNAL_ERROR, failure("opendir /proc"));
            while (dirent* entry = readdir(proc)) {
                char* end;
                long pid = std::strtol(entry->d_name, &end, 10);
                if (*end || end == entry->d_name) continue;
                pids.push_back(pid);
                std::ifstream comm(std::string("/proc/") + entry->d_name + "/comm");
                std::string line;
                std::getline(comm, line);
                names += line + "\n";
            }
            closedir(proc);
            int64_t* out = ec::output<int64_t>(result, "pids", EC_INT64, {static_cast<int64_t>(pids.size())});
            std::copy(pids.begin(), pids.end(), out);
            uint8_t* text = ec::output<uint8_t>(result, "names", EC_UINT8, {static_cast<int64_t>(names.size())});
            std::memcpy(text, names.data(), names.size());
        } else {
            throw ec::Error(EC_UNKNOWN_ALGORITHM, "unknown algorithm " + name);
        }
    });
}

EC_DEFINE_RELEASE()
