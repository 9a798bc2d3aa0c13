// nbd_ops: run a fixed list of NBD requests over a unix socket with libnbd
// and print each result, including the errno of a failure (qemu-io does not
// print a failed flush's errno). Used by integration tests.
//   nbd_ops SOCKET OP...   OP: w:OFFSET:LENGTH  z:OFFSET:LENGTH
//                              t:OFFSET:LENGTH  f
//                              h:FILE  (hold: create FILE, then wait, still
//                              connected, until it is removed; 120 s at most)
// Prints "w 0 4096 ok" or "f error ENOSPC (No space left on device)".
// Exit status: 0 if all succeeded, 1 otherwise, 2 on bad usage.
#include <libnbd.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

const char* ErrnoName(int e) {
  switch (e) {
    case ENOSPC:
      return "ENOSPC";
    case EIO:
      return "EIO";
    case EPERM:
      return "EPERM";
    case EINVAL:
      return "EINVAL";
    case ESHUTDOWN:
      return "ESHUTDOWN";
    case EROFS:
      return "EROFS";
    default:
      return "E?";
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: nbd_ops SOCKET OP...  (w|z|t:OFFSET:LENGTH, f, h:FILE)\n");
    return 2;
  }
  nbd_handle* h = nbd_create();
  if (!h || nbd_connect_unix(h, argv[1]) == -1) {
    fprintf(stderr, "nbd_ops: connect: %s\n", nbd_get_error());
    return 1;
  }
  int bad = 0;
  std::vector<char> buf;
  for (int i = 2; i < argc; ++i) {
    std::string op = argv[i];
    unsigned long long off = 0, len = 0;
    int r;
    if (op == "f") {
      r = nbd_flush(h, 0);
    } else if (op.size() > 2 && op.compare(0, 2, "h:") == 0) {
      const std::string path = op.substr(2);
      FILE* f = fopen(path.c_str(), "w");
      if (!f) {
        fprintf(stderr, "nbd_ops: %s: %s\n", path.c_str(), strerror(errno));
        return 1;
      }
      fclose(f);
      int i = 0;
      for (; i < 2400 && access(path.c_str(), F_OK) == 0; ++i) usleep(50000);
      r = i < 2400 ? 0 : -1;
      if (r == -1) {
        fprintf(stderr, "nbd_ops: %s still there after 120 s\n", path.c_str());
        return 1;
      }
    } else if (op.size() > 2 && sscanf(op.c_str() + 2, "%llu:%llu", &off, &len) == 2) {
      switch (op[0]) {
        case 'w':
          buf.assign(len, static_cast<char>(0xa5));
          r = nbd_pwrite(h, buf.data(), len, off, 0);
          break;
        case 'z':
          r = nbd_zero(h, len, off, 0);
          break;
        case 't':
          r = nbd_trim(h, len, off, 0);
          break;
        default:
          fprintf(stderr, "nbd_ops: bad op %s\n", op.c_str());
          return 2;
      }
    } else {
      fprintf(stderr, "nbd_ops: bad op %s\n", op.c_str());
      return 2;
    }
    if (r == -1) {
      int e = nbd_get_errno();
      printf("%s error %s (%s)\n", op.c_str(), ErrnoName(e), strerror(e));
      bad = 1;
    } else {
      printf("%s ok\n", op.c_str());
    }
  }
  nbd_shutdown(h, 0);
  nbd_close(h);
  return bad;
}
