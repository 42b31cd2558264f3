package framework

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path"
	"runtime"
	"strings"
	"time"
)

// Image is a single-layer image of static binaries, written as a
// docker-archive (manifest.json + config + layer tar) so that containerd
// (ctr images import) and kind (kind load image-archive) take it without a
// registry or a Docker daemon.
type Image struct {
	Tag        string            // e.g. "csi-agent:dev"
	Files      map[string]string // path in the image -> file on disk, mode 0755
	Entrypoint []string
	User       string
}

// epoch keeps the archive byte-for-byte reproducible for the same binaries.
var epoch = time.Unix(0, 0).UTC()

// WriteArchive writes several images into one docker-archive tar.
func WriteArchive(out string, images ...Image) error {
	var archive bytes.Buffer
	tw := tar.NewWriter(&archive)
	var manifest []map[string]any
	for _, img := range images {
		layer, err := layerTar(img.Files)
		if err != nil {
			return fmt.Errorf("image %s: %w", img.Tag, err)
		}
		layerSum := sha256.Sum256(layer)
		layerID := hex.EncodeToString(layerSum[:])
		cfg, err := json.Marshal(map[string]any{
			"architecture": runtime.GOARCH,
			"os":           "linux",
			"created":      epoch,
			"config": map[string]any{
				"Entrypoint": img.Entrypoint,
				"User":       img.User,
				"Env":        []string{"PATH=/"},
			},
			"rootfs": map[string]any{"type": "layers", "diff_ids": []string{"sha256:" + layerID}},
		})
		if err != nil {
			return err
		}
		cfgSum := sha256.Sum256(cfg)
		cfgName := hex.EncodeToString(cfgSum[:]) + ".json"
		layerName := layerID + "/layer.tar"
		if err := addFile(tw, cfgName, cfg, 0o644); err != nil {
			return err
		}
		if err := addFile(tw, layerName, layer, 0o644); err != nil {
			return err
		}
		manifest = append(manifest, map[string]any{
			"Config":   cfgName,
			"RepoTags": []string{img.Tag},
			"Layers":   []string{layerName},
		})
	}
	m, err := json.Marshal(manifest)
	if err != nil {
		return err
	}
	if err := addFile(tw, "manifest.json", m, 0o644); err != nil {
		return err
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return os.WriteFile(out, archive.Bytes(), 0o644)
}

func layerTar(files map[string]string) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	// Directories a container runtime expects to mount over.
	for _, d := range []string{"dev", "etc", "proc", "sys", "tmp", "run", "var", "var/run"} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755, ModTime: epoch}); err != nil {
			return nil, err
		}
	}
	for _, name := range sortedKeys(files) {
		data, err := os.ReadFile(files[name])
		if err != nil {
			return nil, err
		}
		if err := addFile(tw, strings.TrimPrefix(path.Clean("/"+name), "/"), data, 0o755); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func addFile(tw *tar.Writer, name string, data []byte, mode int64) error {
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(data)), ModTime: epoch}); err != nil {
		return err
	}
	_, err := io.Copy(tw, bytes.NewReader(data))
	return err
}
