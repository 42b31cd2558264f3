package fsutil

import (
	"fmt"
	"io"
	"os"
)

// ReadFileLimited reads path, refusing a file larger than limit bytes: the
// files the agent reads are small, and a huge one must not exhaust it.
func ReadFileLimited(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, err // an *os.PathError, naming the file
	}
	if int64(len(data)) > limit {
		return nil, fmt.Errorf("%s: larger than %d bytes", path, limit)
	}
	return data, nil
}
