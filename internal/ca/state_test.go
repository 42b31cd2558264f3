package ca

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func TestRestartKeepsCA(t *testing.T) {
	fc := newFakeClock()
	dir := t.TempDir()
	first := newSelfManaged(t, dir, fc, nil)
	svid := mintX509(t, first, testID)
	token := mintJWT(t, first, testID, "api")

	second := newSelfManaged(t, dir, fc, nil)
	if !second.Bundle().Equal(first.Bundle()) {
		t.Fatal("bundle changed across restart")
	}
	if err := verifyX509(svid, second.Bundle(), fc.Now()); err != nil {
		t.Errorf("X.509-SVID from before the restart: %v", err)
	}
	if err := validateJWT(token, second.Bundle(), "api"); err != nil {
		t.Errorf("JWT-SVID from before the restart: %v", err)
	}
	// And the other way: what the restarted agent mints, old peers accept.
	if err := verifyX509(mintX509(t, second, testID), first.Bundle(), fc.Now()); err != nil {
		t.Error(err)
	}
	// Each run has its own in-memory intermediate.
	if mintX509(t, second, testID).Certificates[1].Equal(svid.Certificates[1]) {
		t.Error("intermediate persisted across restart; it should be in memory only")
	}
}

func TestStatePermissions(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state", "ca")
	newSelfManaged(t, dir, newFakeClock(), nil)
	path := filepath.Join(dir, StateFile)
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if perm := fi.Mode().Perm(); perm != 0o600 {
		t.Errorf("%s mode = %04o, want 0600", path, perm)
	}
	di, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if perm := di.Mode().Perm(); perm != 0o700 {
		t.Errorf("%s mode = %04o, want 0700", dir, perm)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("state dir holds %d entries, want only %s (no temp files left)", len(entries), StateFile)
	}

	if err := os.Chmod(path, 0o640); err != nil {
		t.Fatal(err)
	}
	_, err = newCA(context.Background(), Options{TrustDomain: testTD, StateDir: dir, Clock: newFakeClock()})
	if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "0640") {
		t.Fatalf("New with a group-readable key file = %v, want an error naming %s and its mode", err, path)
	}
}

// Every damaged or mismatched state file must stop the agent with an error
// naming the file, and must be left untouched (never regenerated).
func TestCorruptedState(t *testing.T) {
	fc := newFakeClock()
	goodDir := t.TempDir()
	newSelfManaged(t, goodDir, fc, nil)
	good, err := os.ReadFile(filepath.Join(goodDir, StateFile))
	if err != nil {
		t.Fatal(err)
	}
	blocks := decodeAll(t, good)
	otherKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	otherDER, _ := x509.MarshalPKCS8PrivateKey(otherKey)

	otherTDDir := t.TempDir()
	if _, err := newCA(context.Background(), Options{TrustDomain: spiffeid.RequireTrustDomainFromString("other.org"), StateDir: otherTDDir, Clock: fc}); err != nil {
		t.Fatal(err)
	}
	otherTD, _ := os.ReadFile(filepath.Join(otherTDDir, StateFile))

	flip := func(b []byte, at int) []byte {
		b = bytes.Clone(b)
		b[at] ^= 0x01
		return b
	}
	tests := []struct {
		name string
		data []byte
		want string
	}{
		{"empty", nil, "no root private key"},
		{"truncated", good[:len(good)/2], "malformed"},
		{"garbage appended", append(bytes.Clone(good), "garbage"...), "unexpected data"},
		{"garbage prepended", append([]byte("x\n"), good...), "unexpected data"},
		{"flipped bit in root certificate", flipInBlock(t, good, 1, flip), "certificate"},
		{"root key does not match", encodeAll(replaceBytes(blocks, 0, otherDER)), "does not match"},
		{"missing JWT key", encodeAll(blocks[:2]), "no JWT-SVID private key"},
		{"missing root cert", encodeAll([]*pem.Block{blocks[0], blocks[2]}), "no root certificate"},
		{"key without role", encodeAll(dropHeaders(blocks, 0)), "unexpected private key"},
		{"unknown block", append(bytes.Clone(good), pem.EncodeToMemory(&pem.Block{Type: "FOO", Bytes: []byte{1}})...), `unexpected type "FOO"`},
		{"two JWT keys", encodeAll(append(blocks, blocks[2])), "unexpected private key"},
		{"other trust domain", otherTD, `trust domain "other.org"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, StateFile)
			if err := os.WriteFile(path, tt.data, 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := newCA(context.Background(), Options{TrustDomain: testTD, StateDir: dir, Clock: fc})
			if err == nil {
				t.Fatal("New accepted a damaged state file")
			}
			if !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q should name %s and contain %q", err, path, tt.want)
			}
			after, _ := os.ReadFile(path)
			if !bytes.Equal(after, tt.data) {
				t.Error("damaged state file was rewritten")
			}
		})
	}
}

func decodeAll(t *testing.T, data []byte) []*pem.Block {
	t.Helper()
	var out []*pem.Block
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			break
		}
		out = append(out, b)
	}
	if len(out) != 3 {
		t.Fatalf("state file has %d blocks, want 3", len(out))
	}
	return out
}

func encodeAll(blocks []*pem.Block) []byte {
	var buf bytes.Buffer
	for _, b := range blocks {
		_ = pem.Encode(&buf, b)
	}
	return buf.Bytes()
}

func replaceBytes(blocks []*pem.Block, i int, der []byte) []*pem.Block {
	out := append([]*pem.Block(nil), blocks...)
	nb := *out[i]
	nb.Bytes = der
	out[i] = &nb
	return out
}

func dropHeaders(blocks []*pem.Block, i int) []*pem.Block {
	out := append([]*pem.Block(nil), blocks...)
	nb := *out[i]
	nb.Headers = nil
	out[i] = &nb
	return out
}

// flipInBlock flips a bit inside the DER of block i, near its end (the
// signature), keeping the PEM valid.
func flipInBlock(t *testing.T, data []byte, i int, flip func([]byte, int) []byte) []byte {
	t.Helper()
	blocks := decodeAll(t, data)
	der := flip(blocks[i].Bytes, len(blocks[i].Bytes)-5)
	return encodeAll(replaceBytes(blocks, i, der))
}

// FuzzParseState: no input may crash the state parser, and anything it
// accepts must be internally consistent.
func FuzzParseState(f *testing.F) {
	dir := f.TempDir()
	a, err := newCA(context.Background(), Options{TrustDomain: testTD, StateDir: dir, Clock: newFakeClock()})
	if err != nil {
		f.Fatal(err)
	}
	good, err := os.ReadFile(filepath.Join(dir, StateFile))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add(good[:len(good)/3])
	f.Add([]byte("-----BEGIN PRIVATE KEY-----\nRole: x509-root\n\nAAAA\n-----END PRIVATE KEY-----\n"))
	f.Add([]byte{})
	now := a.clock.Now()
	f.Fuzz(func(t *testing.T, data []byte) {
		st, err := parseState(data, testTD, now)
		if err != nil {
			return
		}
		if !st.root.cert.IsCA || st.jwtKey == nil || !st.root.key.Public().(*ecdsa.PublicKey).Equal(st.root.cert.PublicKey) {
			t.Fatal("accepted an inconsistent state")
		}
	})
}
