package csi

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// kind classifies an error for the gRPC edge; the plain functions never
// speak gRPC.
type kind int

const (
	kindInternal kind = iota
	kindInvalid
	kindNotFound
	kindConflict      // the target holds something that is not ours
	kindAlreadyExists // the target is published for another volume
	kindUnavailable   // not now; the kubelet retries
)

type requestError struct {
	kind kind
	msg  string
}

func (e *requestError) Error() string { return e.msg }

func invalidf(format string, args ...any) error {
	return &requestError{kind: kindInvalid, msg: fmt.Sprintf(format, args...)}
}

func notFoundf(format string, args ...any) error {
	return &requestError{kind: kindNotFound, msg: fmt.Sprintf(format, args...)}
}

func conflictf(format string, args ...any) error {
	return &requestError{kind: kindConflict, msg: fmt.Sprintf(format, args...)}
}

func alreadyExistsf(format string, args ...any) error {
	return &requestError{kind: kindAlreadyExists, msg: fmt.Sprintf(format, args...)}
}

func unavailablef(format string, args ...any) error {
	return &requestError{kind: kindUnavailable, msg: fmt.Sprintf(format, args...)}
}

func kindOf(err error) kind {
	var re *requestError
	if errors.As(err, &re) {
		return re.kind
	}
	return kindInternal
}

// toStatus maps an error of the plain functions to a gRPC status.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, context.Canceled) {
		return status.Error(codes.Canceled, err.Error())
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return status.Error(codes.DeadlineExceeded, err.Error())
	}
	code := codes.Internal
	switch kindOf(err) {
	case kindInvalid:
		code = codes.InvalidArgument
	case kindNotFound:
		code = codes.NotFound
	case kindConflict:
		code = codes.FailedPrecondition
	case kindAlreadyExists:
		code = codes.AlreadyExists
	case kindUnavailable:
		code = codes.Unavailable
	}
	return status.Error(code, err.Error())
}
