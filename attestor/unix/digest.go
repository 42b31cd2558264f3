package unix

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"time"

	sysunix "golang.org/x/sys/unix"
)

// maxDigests bounds the digest cache; one entry per distinct binary version.
const maxDigests = 4096

// digestCache remembers binary digests by file version, and lets concurrent
// attestations of one new binary share a single read.
type digestCache struct {
	mu      sync.Mutex
	entries map[fileKey]*digest
}

type digest struct {
	done chan struct{}
	sum  string
	err  error
}

// get returns the digest of the file version key, computing it with hash on
// a miss. Racy keys bypass the cache (see fileKey.racy).
func (c *digestCache) get(ctx context.Context, key fileKey, hash func() (string, error)) (string, error) {
	if key.racy(time.Now()) {
		return hash()
	}
	c.mu.Lock()
	if d, ok := c.entries[key]; ok {
		c.mu.Unlock()
		select {
		case <-d.done:
		case <-ctx.Done():
			return "", ctx.Err()
		}
		if d.err != nil {
			// Maybe only the other caller's context ended; try on our own.
			return hash()
		}
		return d.sum, nil
	}
	if c.entries == nil {
		c.entries = make(map[fileKey]*digest)
	}
	if len(c.entries) >= maxDigests {
		for k := range c.entries {
			delete(c.entries, k)
			break
		}
	}
	d := &digest{done: make(chan struct{})}
	c.entries[key] = d
	c.mu.Unlock()

	d.sum, d.err = hash()
	if d.err != nil {
		// Failures are not remembered; the next caller tries again.
		c.mu.Lock()
		if c.entries[key] == d {
			delete(c.entries, key)
		}
		c.mu.Unlock()
	}
	close(d.done)
	return d.sum, d.err
}

// errTooLarge: the binary exceeds Options.MaxBinarySize.
var errTooLarge = errors.New("binary larger than the size limit")

// hashFile hashes the open file fd, which must still match key when done: a
// binary that changes while being read yields no digest.
func hashFile(ctx context.Context, fd int, key fileKey, limit int64) (string, error) {
	h := sha256.New()
	buf := make([]byte, 64<<10)
	var total int64
	for {
		if err := ctx.Err(); err != nil {
			return "", err
		}
		n, err := sysunix.Read(fd, buf)
		if err == sysunix.EINTR {
			continue
		}
		if err != nil {
			return "", fmt.Errorf("read binary: %w", err)
		}
		if n == 0 {
			break
		}
		total += int64(n)
		if total > limit {
			return "", errTooLarge
		}
		h.Write(buf[:n])
	}
	var st sysunix.Stat_t
	if err := sysunix.Fstat(fd, &st); err != nil {
		return "", fmt.Errorf("stat binary: %w", err)
	}
	if keyOf(&st) != key || total != key.size {
		return "", errors.New("binary changed while being hashed")
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
