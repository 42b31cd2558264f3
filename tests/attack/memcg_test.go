package attack

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// memcg is a real memory cgroup (v2, else v1) with a hard limit and no swap.
type memcg struct {
	dir string
	v2  bool
}

func newMemcg(t *testing.T, limit int64) *memcg {
	t.Helper()
	name := fmt.Sprintf("csi-agent-attack-%d", os.Getpid())
	m := &memcg{}
	if data, err := os.ReadFile("/sys/fs/cgroup/cgroup.controllers"); err == nil && strings.Contains(string(data), "memory") {
		m.v2, m.dir = true, filepath.Join("/sys/fs/cgroup", name)
	} else {
		m.dir = filepath.Join("/sys/fs/cgroup/memory", name)
	}
	if err := os.Mkdir(m.dir, 0o755); err != nil {
		t.Fatalf("create memory cgroup: %v", err)
	}
	t.Cleanup(func() {
		// Whatever is left inside is ours: kill it, then remove the group.
		deadline := time.Now().Add(10 * time.Second)
		for {
			pids := m.pids()
			for _, pid := range pids {
				if p, err := os.FindProcess(pid); err == nil {
					_ = p.Kill()
				}
			}
			if err := os.Remove(m.dir); err == nil || time.Now().After(deadline) {
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
	})
	v := strconv.FormatInt(limit, 10)
	if m.v2 {
		m.write(t, "memory.max", v)
		m.write(t, "memory.swap.max", "0")
	} else {
		m.write(t, "memory.limit_in_bytes", v)
		if _, err := os.Stat(filepath.Join(m.dir, "memory.memsw.limit_in_bytes")); err == nil {
			m.write(t, "memory.memsw.limit_in_bytes", v)
		}
	}
	return m
}

func (m *memcg) write(t *testing.T, file, value string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(m.dir, file), []byte(value), 0o644); err != nil {
		t.Fatalf("write %s: %v", file, err)
	}
}

func (m *memcg) pids() []int {
	data, _ := os.ReadFile(filepath.Join(m.dir, "cgroup.procs"))
	var out []int
	for _, f := range strings.Fields(string(data)) {
		if n, err := strconv.Atoi(f); err == nil {
			out = append(out, n)
		}
	}
	return out
}

// ooms is how many processes the kernel killed for the limit.
func (m *memcg) ooms(t *testing.T) int {
	t.Helper()
	file := "memory.oom_control"
	if m.v2 {
		file = "memory.events"
	}
	f, err := os.Open(filepath.Join(m.dir, file))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), " "); ok && k == "oom_kill" {
			n, _ := strconv.Atoi(v)
			return n
		}
	}
	t.Fatalf("%s has no oom_kill count", file)
	return 0
}

// peak is the most memory the group has used.
func (m *memcg) peak() int64 {
	for _, file := range []string{"memory.peak", "memory.max_usage_in_bytes"} {
		if data, err := os.ReadFile(filepath.Join(m.dir, file)); err == nil {
			n, _ := strconv.ParseInt(strings.TrimSpace(string(data)), 10, 64)
			return n
		}
	}
	return -1
}
